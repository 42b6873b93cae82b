// Scenario 9: webhooks, received by a Node HTTP server that checks every request with
// the official Node SDK (`pusher.webhook(request).isValid()`), while real pusher-js
// clients spread over the workers cause each kind of event. The Python side wrote Vask's
// configuration with this receiver's URL (E2E_WEBHOOK_PORT) and a short leave delay
// (E2E_LEAVE_DELAY_MS), and asserts on what is observed here.
import http from 'node:http';
import {
  run, spread, subscribe, waitUntil, api, observe, check, step, tag,
} from './lib.mjs';

const port = Number(process.env.E2E_WEBHOOK_PORT);
const leaveDelayMs = Number(process.env.E2E_LEAVE_DELAY_MS ?? 1000);
const received = []; // events of valid requests, in arrival order
const invalid = []; // requests the SDK refused

function listen() {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const rawBody = Buffer.concat(chunks).toString('utf8');
      const hook = api.webhook({ headers: req.headers, rawBody });
      if (hook.isValid()) {
        for (const event of hook.getEvents()) received.push(event);
      } else {
        invalid.push({ headers: req.headers, rawBody });
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{}');
    });
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

const named = (name, channel) => (e) => e.name === name && e.channel === channel;

run(async () => {
  const server = await listen();
  const pub = `wh-${tag}`;
  const room = `presence-wh-${tag}`;
  const priv = `private-wh-${tag}`;
  const cache = `cache-wh-${tag}`;

  step('connect');
  // A and B are two tabs of user u1 on different workers; C is u2 on the third.
  const users = { A: 'u1', B: 'u1', C: 'u2' };
  const [a, b, c] = await spread(['A', 'B', 'C'], (label) => ({
    user: { user_id: users[label], user_info: { label } },
  }));
  observe('socket_ids', [a, b, c].map((x) => x.pusher.connection.socket_id));

  step('subscribe');
  await subscribe(a, pub);
  await subscribe(c, pub);
  for (const x of [a, b, c]) await subscribe(x, room);
  const { channel: privA } = await subscribe(a, priv);
  await subscribe(c, priv);
  const roomC = c.pusher.channel(room);
  await subscribe(a, cache).catch(() => null); // a miss answers with pusher:cache_miss
  await subscribe(c, cache).catch(() => null);

  step('client events');
  check('private trigger accepted', privA.trigger('client-ping', { n: 1 }) === true);
  check('presence trigger accepted', roomC.trigger('client-wave', 'hi') === true);

  step('webhooks arrive');
  const wanted = [
    named('channel_occupied', pub), named('channel_occupied', room),
    named('channel_occupied', priv), named('channel_occupied', cache),
    named('member_added', room), named('cache_miss', cache),
    named('client_event', priv), named('client_event', room),
  ];
  await waitUntil('every webhook of the joins and whispers',
    () => wanted.every((w) => received.some(w)), 10000)
    .catch((err) => check('webhooks arrived', false, String(err.message)));

  step('C leaves for good');
  const leftAt = Date.now();
  c.pusher.disconnect();
  await waitUntil('member_removed of u2', () => received.some(named('member_removed', room)),
    leaveDelayMs + 8000)
    .catch((err) => check('member_removed arrived', false, String(err.message)));
  observe('removed_after_ms', Date.now() - leftAt);
  // A marker: trigger an event on a fresh channel occupied now; once its occupied
  // webhook is in, anything C's departure caused without delay would be in too.
  step('marker');
  const marker = `wh-marker-${tag}`;
  await subscribe(a, marker);
  await waitUntil('marker occupied', () => received.some(named('channel_occupied', marker)), 8000)
    .catch((err) => check('marker webhook arrived', false, String(err.message)));
  observe('events', received.filter((e) => e.channel !== marker));
  observe('invalid', invalid.length);
  observe('channels', { pub, room, priv, cache });
  observe('sockets', { A: a.pusher.connection.socket_id, C: c.pusher.connection.socket_id });
  server.close();
});
