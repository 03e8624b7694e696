/**
 * A real Redis for the tests: Debian's `redis-server` on 127.0.0.1 and a free port, no persistence
 * (`--save '' --appendonly no`), killed at the end. `restart()` kills it (SIGKILL) and starts a fresh
 * one on the same port, as an outage would.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';

export interface TestRedis {
  readonly url: string;
  readonly port: number;
  /** Kills the server (SIGKILL); resolves once it is gone. */
  kill(): Promise<void>;
  /** Starts a server on the same port again (after {@link kill}). */
  start(): Promise<void>;
  /** Kill, then start. */
  restart(): Promise<void>;
  /** Stops it for good. */
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    let buf = '';
    sock.setTimeout(500);
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString();
      if (buf.includes('\r\n')) {
        sock.destroy();
        resolve(buf.startsWith('+PONG'));
      }
    });
    sock.on('error', () => resolve(false));
    sock.on('timeout', () => {
      sock.destroy();
      resolve(false);
    });
  });
}

/** Starts a Redis server for a test file. */
export async function startRedis(): Promise<TestRedis> {
  const port = await freePort();
  let proc: ChildProcess | undefined;
  let log = '';
  const start = async (): Promise<void> => {
    log = '';
    proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--maxmemory-policy', 'noeviction'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    proc.stdout!.on('data', (d: Buffer) => (log += d.toString()));
    proc.stderr!.on('data', (d: Buffer) => (log += d.toString()));
    const spawned = proc;
    const t0 = Date.now();
    while (!(await ping(port))) {
      if (spawned.exitCode !== null) throw new Error(`redis-server exited (${spawned.exitCode}): ${log.slice(-500)}`);
      if (Date.now() - t0 > 10_000) throw new Error(`redis-server did not answer on ${port}: ${log.slice(-500)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const kill = async (): Promise<void> => {
    const p = proc;
    proc = undefined;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGKILL');
    });
  };
  await start();
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    kill,
    start,
    async restart() {
      await kill();
      await start();
    },
    stop: kill,
  };
}
