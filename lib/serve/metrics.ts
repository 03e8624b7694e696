/**
 * Prometheus metrics of the service (prom-client, own registry): queue depth, images/s, seconds per
 * pipeline stage, errors by code, plus the process defaults.
 *
 * @module
 */
import { Registry, Counter, Gauge, Histogram, collectDefaultMetrics } from 'prom-client';
import type { Progress } from '../pipeline/index.js';

/** The service's metrics. */
export class ServiceMetrics {
  readonly registry = new Registry();
  readonly images: Counter<'route'>;
  readonly errors: Counter<'code'>;
  readonly stages: Histogram<'stage'>;
  readonly requests: Counter<'route' | 'status'>;
  private readonly done: number[] = [];

  /**
   * @param depth current local queue (running + waiting requests)
   * @param redisDepth waiting jobs in the Redis queue (undefined without `--redis`)
   */
  constructor(depth: () => number, redisDepth?: () => Promise<number | undefined>) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: 'df_' });
    this.images = new Counter({ name: 'df_images_total', help: 'Images whose features were returned or enqueued', labelNames: ['route'], registers });
    this.errors = new Counter({ name: 'df_errors_total', help: 'Failed requests by error code', labelNames: ['code'], registers });
    this.requests = new Counter({ name: 'df_http_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'status'], registers });
    this.stages = new Histogram({
      name: 'df_stage_seconds',
      help: 'Seconds per pipeline stage of in-process extractions',
      labelNames: ['stage'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers,
    });
    const recent = this.done;
    new Gauge({
      name: 'df_images_per_second',
      help: 'In-process images per second over the last 60 s',
      registers,
      collect() {
        const now = Date.now();
        while (recent.length && recent[0]! < now - 60_000) recent.shift();
        this.set(recent.length / 60);
      },
    });
    new Gauge({
      name: 'df_queue_depth',
      help: 'Work waiting or running: local = in-process requests of this server, redis = waiting jobs of the queue',
      labelNames: ['queue'],
      registers,
      async collect() {
        this.set({ queue: 'local' }, depth());
        if (redisDepth) {
          const n = await redisDepth().catch(() => undefined);
          if (n !== undefined) this.set({ queue: 'redis' }, n);
        }
      },
    });
  }

  /** Records one finished in-process image. */
  imageDone(): void {
    this.images.inc({ route: 'extract' });
    this.done.push(Date.now());
    if (this.done.length > 100_000) this.done.splice(0, this.done.length - 100_000);
  }

  /** A progress callback that times the stages of one extraction (a stage lasts until the next event). */
  stageTimer(): (p: Progress) => void {
    let stage: string | undefined;
    let t0 = performance.now();
    return (p) => {
      if (p.stage === stage) return;
      const now = performance.now();
      if (stage) this.stages.observe({ stage }, (now - t0) / 1000);
      stage = p.stage === 'done' ? undefined : p.stage;
      t0 = now;
    };
  }
}
