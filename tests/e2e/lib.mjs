// Shared plumbing for the e2e scenarios: real pusher-js clients and the real Node server
// SDK ("pusher") pointed at a running Vask. Each scenario script imports this, runs one
// story, and ends with exactly one JSON line on stdout (see finish()).
//
// Settings come from argv (--port N --key K --secret S --app-id I) or, failing that, from
// E2E_PORT / E2E_KEY / E2E_SECRET / E2E_APP_ID, so a scenario can also be run by hand:
//   node tests/e2e/connect.mjs --port 6001

import PusherClient from 'pusher-js';
import PusherServer from 'pusher';
import { isDeepStrictEqual } from 'node:util';

function argValue(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : undefined;
}

export const settings = {
  port: Number(argValue('port') ?? process.env.E2E_PORT),
  key: argValue('key') ?? process.env.E2E_KEY ?? 'app-key',
  secret: argValue('secret') ?? process.env.E2E_SECRET ?? 'app-secret',
  appId: argValue('app-id') ?? process.env.E2E_APP_ID ?? '1',
  // Whole-script budget; the Python side kills us a little after this anyway.
  timeoutMs: Number(argValue('timeout-ms') ?? process.env.E2E_TIMEOUT_MS ?? 15000),
  // How many workers the server runs (clients are placed over them, see spread()).
  workers: Number(argValue('workers') ?? process.env.E2E_WORKERS ?? 1),
  // --tls: the server speaks TLS (wss:// and https://); trust its CA with
  // NODE_EXTRA_CA_CERTS=<ca.pem> in the environment.
  tls: process.argv.includes('--tls'),
};

if (!Number.isInteger(settings.port) || settings.port <= 0) {
  console.error('usage: node <scenario>.mjs --port N [--key K --secret S --app-id I]');
  process.exit(64);
}

const scenario = process.argv[1].replace(/^.*\//, '').replace(/\.m?js$/, '');
const failures = [];
const observed = {};
const clients = [];
let currentStep = 'start';

// The HTTP side of the test: the official Node server SDK, used both to sign
// auth requests (no HTTP auth endpoint needed) and to call Vask's HTTP API.
export const api = new PusherServer({
  appId: settings.appId,
  key: settings.key,
  secret: settings.secret,
  host: '127.0.0.1',
  port: String(settings.port),
  useTLS: settings.tls,
  timeout: 5000,
});

// A second SDK instance with the wrong secret, to produce signatures Vask must refuse.
const forger = new PusherServer({
  appId: settings.appId,
  key: settings.key,
  secret: `${settings.secret}-wrong`,
  host: '127.0.0.1',
  port: String(settings.port),
  useTLS: settings.tls,
});

/** Record a fact for the Python side to assert on. */
export function observe(name, value) {
  observed[name] = value;
  return value;
}

/** A soft assertion: the script keeps going so one run reports every mismatch. */
export function check(name, condition, detail) {
  if (!condition) failures.push({ check: name, detail: detail === undefined ? null : detail });
  return condition;
}

/** Name what the script is doing now, so a timeout says where it got stuck. */
export function step(name) {
  currentStep = name;
}

function snapshot() {
  return clients.map((c) => ({
    name: c.label,
    state: c.pusher.connection.state,
    socket_id: c.pusher.connection.socket_id ?? null,
    states: c.states,
    errors: c.errors,
    frames: c.frames,
  }));
}

function emit(extra) {
  const ok = failures.length === 0 && !extra.error;
  const result = { scenario, ok, step: currentStep, failures, observed, ...extra };
  // Frames are only useful when something went wrong; keep the happy line short.
  if (!ok) result.clients = snapshot();
  process.stdout.write(`${JSON.stringify(result)}\n`);
  return ok;
}

let finished = false;

/** Print the single result line, close every client, exit 0 when all checks held. */
export function finish(extra = {}) {
  if (finished) return;
  finished = true;
  const ok = emit(extra);
  for (const c of clients) {
    try {
      c.pusher.disconnect();
    } catch {
      // already gone; nothing to clean up
    }
  }
  // Give the close frames a moment to leave, then exit regardless of open handles.
  setTimeout(() => process.exit(ok ? 0 : 1), 50).unref();
  setTimeout(() => process.exit(ok ? 0 : 1), 300);
}

/** Run the scenario body; any throw (including step timeouts) becomes a failed result. */
export function run(body) {
  setTimeout(() => {
    if (finished) return;
    finished = true;
    console.error(`timeout in step: ${currentStep}`);
    emit({ error: `hard timeout after ${settings.timeoutMs} ms in step: ${currentStep}` });
    process.exit(2);
  }, settings.timeoutMs).unref();
  Promise.resolve()
    .then(body)
    .then(
      () => finish(),
      (err) => finish({ error: String(err && err.stack ? err.stack : err) }),
    );
}

/** Reject after ms with a message naming what we were waiting for. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Structural equality: key order inside JSON objects is not part of any contract. */
export const same = (a, b) => isDeepStrictEqual(a, b);

/** Poll until predicate() (sync or async) holds; reject naming `what` after ms. */
export function waitUntil(what, predicate, ms = 5000) {
  let over = false;
  return within(ms, what, new Promise((resolve, reject) => {
    const poll = async () => {
      try {
        if (await predicate()) {
          resolve();
          return;
        }
      } catch (err) {
        reject(err);
        return;
      }
      if (!over) setTimeout(poll, 20);
    };
    poll();
  })).finally(() => {
    over = true;
  });
}


/**
 * A pusher-js client with auth handlers that sign locally with the Node SDK.
 *   user:       presence identity {user_id, user_info} for presence channels
 *   signinUser: user_data object for pusher.signin() ({id, ...})
 *   badAuth:    sign channel auth with the wrong secret
 */
export function makeClient(label, opts = {}) {
  const entry = { label, states: [], errors: [], frames: [], pusher: null };
  const channelAuthorization = {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        const signer = opts.badAuth ? forger : api;
        const presence = channelName.startsWith('presence-') ? opts.user : undefined;
        callback(null, signer.authorizeChannel(socketId, channelName, presence));
      } catch (err) {
        callback(err, null);
      }
    },
  };
  const userAuthentication = {
    customHandler: ({ socketId }, callback) => {
      try {
        callback(null, api.authenticateUser(socketId, opts.signinUser));
      } catch (err) {
        callback(err, null);
      }
    },
  };
  const pusher = new PusherClient(settings.key, {
    wsHost: '127.0.0.1',
    wsPort: settings.port,
    wssPort: settings.port,
    forceTLS: settings.tls,
    enabledTransports: settings.tls ? ['ws', 'wss'] : ['ws'],
    cluster: 'mt1',
    disableStats: true,
    channelAuthorization,
    userAuthentication,
  });
  entry.pusher = pusher;
  pusher.connection.bind('state_change', ({ current }) => entry.states.push(current));
  pusher.connection.bind('error', (err) => entry.errors.push(simplifyError(err)));
  // Every decoded frame from the server, kept for the failure report.
  pusher.connection.bind('message', (m) => {
    if (entry.frames.length < 200) entry.frames.push(m);
  });
  clients.push(entry);
  return entry;
}

function simplifyError(err) {
  if (!err || typeof err !== 'object') return err;
  const out = { type: err.type };
  if (err.error) out.error = err.error.data ?? String(err.error);
  if (err.data) out.data = err.data;
  return out;
}

/** Wait until the client's connection reaches `connected`. */
export function connected(entry, ms = 5000) {
  const conn = entry.pusher.connection;
  if (conn.state === 'connected') return Promise.resolve(conn.socket_id);
  return within(
    ms,
    `${entry.label} to connect`,
    new Promise((resolve) => {
      const onChange = ({ current }) => {
        if (current === 'connected') {
          conn.unbind('state_change', onChange);
          resolve(conn.socket_id);
        }
      };
      conn.bind('state_change', onChange);
    }),
  );
}

/** Resolve with the first payload of `event` on `target` (channel, connection, user...). */
export function once(target, event) {
  return new Promise((resolve) => {
    const handler = (data, metadata) => {
      target.unbind(event, handler);
      resolve({ data, metadata });
    };
    target.bind(event, handler);
  });
}

/**
 * Subscribe and resolve on pusher:subscription_succeeded; reject (with the server's
 * error payload) on pusher:subscription_error. The channel object is returned either way
 * through `channel` so callers can bind before the first server event lands.
 */
export function subscribe(entry, name, ms = 5000, prepare) {
  const channel = entry.pusher.subscribe(name);
  if (prepare) prepare(channel);
  const outcome = new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_succeeded', (data) => resolve(data));
    channel.bind('pusher:subscription_error', (err) =>
      reject(new Error(`subscription_error on ${name}: ${JSON.stringify(err)}`)),
    );
  });
  return within(ms, `${entry.label} to subscribe ${name}`, outcome).then((data) => ({
    channel,
    data,
  }));
}

/** Wait for a subscription error, resolving with its payload (used for negative cases). */
export function subscriptionError(entry, name, ms = 5000) {
  const channel = entry.pusher.subscribe(name);
  const outcome = new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_error', (err) => resolve(err));
    channel.bind('pusher:subscription_succeeded', () =>
      reject(new Error(`${entry.label} was allowed into ${name} with a bad signature`)),
    );
  });
  return within(ms, `${entry.label} to be refused ${name}`, outcome);
}

/** Unique-per-run suffix so channel names never collide across scenarios. */
export const tag = `${process.pid}${Date.now() % 100000}`;

let markerChannels = 0;

/**
 * "Nothing unwanted arrived", checked without sleeping. Every client in `entries`
 * subscribes to a fresh public marker channel; the returned `mark(what)` publishes a
 * marker event there through the HTTP API and waits until every client has it.
 *
 * Call `mark` once the broker has handled whatever could cause an unwanted event (for
 * example once every intended recipient has its event). The broker sends to each worker
 * in order and each worker to its clients in order, so an unwanted event that is on its
 * way arrives before the marker; under load the marker only comes later, it never lets
 * a late unwanted event pass unseen.
 */
export async function markers(entries, ms = 5000) {
  markerChannels += 1;
  const name = `marker-${tag}-${markerChannels}`;
  const seen = new Map(entries.map((e) => [e, 0]));
  await Promise.all(entries.map((e) => subscribe(e, name, ms, (ch) => {
    ch.bind('marker', () => seen.set(e, seen.get(e) + 1));
  })));
  let sent = 0;
  return async (what) => {
    sent += 1;
    const n = sent;
    await api.trigger(name, 'marker', { n });
    await waitUntil(`marker ${n} (${what}) at every client`,
      () => entries.every((e) => seen.get(e) >= n), ms);
  };
}

// --- placing clients on workers ----------------------------------------------------
// A socket id is "<worker prefix>.<n>"; the prefix names the worker holding the
// connection. SO_REUSEPORT spreads connections by a hash, so a scenario that needs
// clients on different workers connects until each lands where it is wanted.

const PLACEMENT_ATTEMPTS = 60;

/** The worker prefix of a connected client. */
export const workerOf = (entry) => String(entry.pusher.connection.socket_id).split('.')[0];

/**
 * A connected client on worker `want`, or (without `want`) on a worker not in `avoid`.
 * Misplaced connections are closed and forgotten; after PLACEMENT_ATTEMPTS it throws.
 */
export async function connectOn(label, opts = {}, { want, avoid = [] } = {}) {
  const seen = {};
  for (let i = 0; i < PLACEMENT_ATTEMPTS; i += 1) {
    const entry = makeClient(label, opts);
    await connected(entry);
    const prefix = workerOf(entry);
    if (want !== undefined ? prefix === want : !avoid.includes(prefix)) return entry;
    seen[prefix] = (seen[prefix] ?? 0) + 1;
    entry.pusher.disconnect();
    clients.splice(clients.indexOf(entry), 1);
  }
  const target = want !== undefined ? `worker ${want}` : `a worker not in ${JSON.stringify(avoid)}`;
  throw new Error(`${label}: no connection landed on ${target} in ${PLACEMENT_ATTEMPTS} attempts; saw ${JSON.stringify(seen)}`);
}

/**
 * Connected clients, one per label, placed round-robin over the server's workers
 * (settings.workers): client i shares the worker of client i % workers, and the first
 * `workers` clients are on different workers. `optsFor(label, i)` gives makeClient's opts.
 */
export async function spread(labels, optsFor = () => ({})) {
  const out = [];
  for (const [i, label] of labels.entries()) {
    const w = settings.workers;
    const place = i < w ? { avoid: out.map(workerOf) } : { want: workerOf(out[i % w]) };
    out.push(await connectOn(label, optsFor(label, i), place));
  }
  return out;
}
