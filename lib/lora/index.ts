/**
 * LoRA support: parsing and mapping LoRA files onto model parameters (`./parse.ts`), and merging and
 * swapping them in a loaded pipeline (`./manager.ts`). The merge rule is in docs/method.md §LoRA.
 *
 * @module
 */
export * from './parse.js';
export { LoraManager } from './manager.js';
