/**
 * `diffusion-features/scale`: the scale-out (BullMQ workers on Redis) and the HTTP service, as a
 * typed API. A separate entry point, so that `import 'diffusion-features'` never loads BullMQ,
 * ioredis, fastify or prom-client: users who never scale out pay nothing for them.
 *
 * ```ts
 * import { enqueue, waitForJobs, runWorker, createServer } from 'diffusion-features/scale';
 * const worker = await runWorker({ redis: 'redis://127.0.0.1:6379', weights: 'sd15', out: '/shared/features', devices: ['cuda:0', 'cuda:1'] });
 * worker.on('completed', (id, r) => console.log(id, r.output));
 * const { jobs } = await enqueue({ redis: 'redis://127.0.0.1:6379', images: ['/shared/img/cat.png'], extract: { layers: 'legacy', seed: 1 } });
 * await waitForJobs({ redis: 'redis://127.0.0.1:6379', jobs });
 * await worker.close();
 * ```
 *
 * @module
 */
export * from './queue/index.js';
export * from './serve/index.js';
