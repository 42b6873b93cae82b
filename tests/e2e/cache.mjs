// Scenario 8: cache channels. The last event triggered through the HTTP API is kept and
// replayed to each new subscriber right after subscription_succeeded (subscribers spread
// over workers, so the cache must be cluster-wide); an empty cache channel answers
// pusher:cache_miss instead. The HTTP API reports the cached event with info=cache.
import {
  run, spread, subscribe, waitUntil, same, markers, api, observe, check, step, tag,
} from './lib.mjs';

const SUBSCRIBERS = 3;

// Everything a channel emits, in order, including pusher:* events, so we can check
// that the replay comes right after subscription_succeeded.
const recorder = (c) => (ch) => {
  c.seen = c.seen ?? {};
  c.seen[ch.name] = [];
  ch.bind_global((event, data) => c.seen[ch.name].push({ event, data }));
};

async function body(promise) {
  const response = await promise;
  return { status: response.status, body: await response.json() };
}

run(async () => {
  const full = `cache-scores-${tag}`;
  const empty = `cache-quiet-${tag}`;

  // Two triggers before anyone listens: only the last one may be replayed.
  step('prime cache');
  await api.trigger(full, 'score', { home: 2, away: 1 });
  await api.trigger(full, 'score', { home: 3, away: 1 });

  step('cache info');
  const info = await body(api.get({ path: `/channels/${full}`, params: { info: 'cache' } }));
  observe('cache_info', info);
  const cached = info.body && info.body.cache;
  check('info=cache returns the last event', info.status === 200 && cached && typeof cached === 'object' &&
    cached.event === 'score' && same(JSON.parse(cached.data), { home: 3, away: 1 }) &&
    typeof cached.ttl === 'number' && cached.ttl > 0, info);
  const emptyInfo = await body(api.get({ path: `/channels/${empty}`, params: { info: 'cache' } }));
  observe('empty_cache_info', emptyInfo);
  check('info=cache is null for an empty cache channel', emptyInfo.status === 200 &&
    emptyInfo.body.cache === null, emptyInfo);

  step('connect');
  const clients = await spread(Array.from({ length: SUBSCRIBERS }, (_, i) => `S${i}`));
  observe('socket_ids', clients.map((c) => c.pusher.connection.socket_id));
  // absence checks below wait for a marker on a separate public channel (see lib.mjs)
  step('marker channel');
  const mark = await markers(clients);

  step('subscribe to the primed channel');
  await Promise.all(clients.map((c) => subscribe(c, full, 5000, recorder(c))));
  await waitUntil('the cached event at every subscriber', () =>
    clients.every((c) => c.seen[full].some((e) => e.event === 'score')))
    .catch((err) => check('cached event replayed to every subscriber', false, String(err.message)));
  await mark('after the replays'); // a second (stale) replay would come before it
  observe('primed_sequences', Object.fromEntries(clients.map((c) => [c.label, [...c.seen[full]]])));
  for (const c of clients) {
    const events = c.seen[full];
    check(`${c.label}: subscription_succeeded then exactly the last cached event`, events.length === 2 &&
      events[0].event === 'pusher:subscription_succeeded' &&
      events[1].event === 'score' && same(events[1].data, { home: 3, away: 1 }), events);
  }

  step('subscribe to the empty channel');
  await Promise.all(clients.map((c) => subscribe(c, empty, 5000, recorder(c))));
  await waitUntil('pusher:cache_miss at every subscriber', () =>
    clients.every((c) => c.seen[empty].some((e) => e.event === 'pusher:cache_miss')))
    .catch((err) => check('cache_miss sent to every subscriber', false, String(err.message)));
  await mark('after the cache misses');
  observe('empty_sequences', Object.fromEntries(clients.map((c) => [c.label, c.seen[empty].map((e) => e.event)])));
  for (const c of clients) {
    check(`${c.label}: subscription_succeeded then cache_miss`, same(c.seen[empty].map((e) => e.event),
      ['pusher:subscription_succeeded', 'pusher:cache_miss']), c.seen[empty]);
  }

  // Live events still flow normally after the replay, exactly once.
  step('live trigger');
  await api.trigger(full, 'score', { home: 4, away: 1 });
  await waitUntil('the live event at every subscriber', () =>
    clients.every((c) => c.seen[full].length >= 3))
    .catch((err) => check('live event after replay', false, String(err.message)));
  await mark('after the live event'); // a duplicate would come before it
  for (const c of clients) {
    check(`${c.label}: live event once`, c.seen[full].length === 3 && same(c.seen[full][2].data, { home: 4, away: 1 }),
      c.seen[full]);
  }
});
