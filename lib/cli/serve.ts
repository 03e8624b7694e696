/**
 * `serve` (docs/scale-out.md, "The service"): the fastify service. fastify, prom-client and (with `--redis`) BullMQ are
 * imported only when it runs.
 *
 * @module
 */
import { Command, Option } from 'commander';
import { intArg } from './args.js';
import type { Device } from '../native.js';

interface ServeCli {
  weights: string;
  host: string;
  port: number;
  device: Device;
  dtype: 'auto' | 'float32' | 'float16';
  redis?: string;
  queue: string;
  spool?: string;
  out?: string;
  maxBody: number;
  maxPixels: number;
  maxSize: number;
  maxQueue: number;
  maxQueueJobs: number;
  log?: boolean;
}

/** Runs the service until SIGTERM/SIGINT, then drains (running requests finish) and exits 0. */
export async function runServe(o: ServeCli): Promise<number> {
  const { createServer } = await import('../serve/app.js');
  const server = await createServer({
    weights: o.weights,
    device: o.device,
    dtype: o.dtype,
    redis: o.redis,
    queue: o.queue,
    spool: o.spool,
    out: o.out,
    maxBodyBytes: o.maxBody,
    maxPixels: o.maxPixels,
    maxSize: o.maxSize,
    maxQueue: o.maxQueue,
    maxQueueJobs: o.maxQueueJobs,
    logger: !!o.log,
  });
  const url = await server.listen({ host: o.host, port: o.port });
  console.error(`serving on ${url} (device ${server.pipeline.device}${o.redis ? `, queue ${o.queue}` : ''}): POST /v1/extract${o.redis ? ', POST /v1/jobs, GET /v1/jobs/:id' : ''}, GET /healthz /readyz /metrics`);
  await new Promise<void>((resolve) => {
    const stop = (sig: NodeJS.Signals): void => {
      console.error(`${sig}: draining (running requests finish), then exiting`);
      void server.close().then(resolve);
    };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
  console.error('stopped');
  return 0;
}

/** Registers `serve`. */
export function registerServeCommand(program: Command): void {
  program
    .command('serve')
    .description('HTTP service (fastify): POST /v1/extract, with --redis POST /v1/jobs + GET /v1/jobs/:id, GET /healthz /readyz /metrics')
    .requiredOption('--weights <dir>', 'exported weights folder')
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--port <n>', 'port (0: any free one)', intArg('--port', 0, 65535), 8080)
    .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('auto'))
    .addOption(new Option('--dtype <dtype>', 'compute dtype').choices(['auto', 'float32', 'float16']).default('auto'))
    .option('--redis <url>', 'Redis URL: enables /v1/jobs through the queue')
    .option('--queue <name>', 'queue name', 'diffusion-features')
    .option('--spool <dir>', 'with --redis: folder for uploads, as the workers see it')
    .option('--out <dir>', "with --redis: the workers' output folder (results are read from it)")
    .option('--max-body <bytes>', 'largest request body', intArg('--max-body', 1024, 2 ** 31), 16 * 2 ** 20)
    .option('--max-pixels <n>', 'largest decoded image (width × height)', intArg('--max-pixels', 1, 2 ** 31), 40_000_000)
    .option('--max-size <n>', 'largest size option', intArg('--max-size', 64, 4096), 1024)
    .option('--max-queue <n>', 'in-process requests that may wait; more get 503 + Retry-After', intArg('--max-queue', 0, 100_000), 8)
    .option('--max-queue-jobs <n>', 'waiting queue jobs before POST /v1/jobs answers 503', intArg('--max-queue-jobs', 1, 10_000_000), 10_000)
    .option('--log', 'log requests (pino JSON lines)')
    .action(async (o: ServeCli) => {
      process.exitCode = await runServe(o);
    });
}
