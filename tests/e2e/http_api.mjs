// Scenario 7: the HTTP API through the official Node SDK, checked against what real
// pusher-js clients (spread over workers) see: socket_id exclusion, batch triggers,
// and channel / presence queries whose answers must reflect the whole cluster.
import {
  run, spread, subscribe, waitUntil, same, api, observe, check, step, tag,
} from './lib.mjs';

async function body(promise) {
  const response = await promise;
  return { status: response.status, body: await response.json() };
}

run(async () => {
  const pub = `feed-${tag}`;
  const room = `presence-lobby-${tag}`;

  // Public channel: three listeners (one per worker), the first of which will be excluded.
  // Presence: user u1 twice (two tabs), u2 and u3 once: 3 users, 4 subscriptions.
  const presence = [['P-u1a', 'u1'], ['P-u1b', 'u1'], ['P-u2', 'u2'], ['P-u3', 'u3']];
  step('connect');
  const everyone = await spread(['L0', 'L1', 'L2', ...presence.map(([label]) => label)],
    (label, i) => (i < 3 ? {} : { user: { user_id: presence[i - 3][1], user_info: { label } } }));
  const listeners = everyone.slice(0, 3);
  const people = everyone.slice(3);
  for (const c of everyone) c.got = [];
  observe('socket_ids', everyone.map((c) => c.pusher.connection.socket_id));
  step('subscribe');
  const record = (c) => (ch) => ch.bind_global((event, data) => {
    if (!event.startsWith('pusher')) c.got.push({ channel: ch.name, event, data });
  });
  await Promise.all(listeners.map((c) => subscribe(c, pub, 5000, record(c))));
  await Promise.all(people.map((c) => subscribe(c, room, 5000, record(c))));
  // Presence joins are announced asynchronously across workers; let the roster settle
  // so the counts below are not racing the last join.
  await waitUntil('every presence roster at 3 users', () =>
    people.every((c) => c.pusher.channel(room).members.count === 3))
    .catch((err) => check('presence rosters settled', false, String(err.message)));

  // --- trigger with socket_id exclusion --------------------------------------------
  step('trigger excluding L0');
  const excluded = listeners[0];
  const r1 = await body(api.trigger(pub, 'not-for-l0', { n: 1 }, { socket_id: excluded.pusher.connection.socket_id }));
  observe('trigger_excluding', r1);
  check('trigger answers 200 {}', r1.status === 200 && same(r1.body, {}), r1);
  // A follow-up everybody gets: once L0 has it, anything meant for L0 before it would
  // already have arrived (per-connection order), so L0's silence is meaningful.
  const r2 = await body(api.trigger(pub, 'for-all', { n: 2 }));
  check('second trigger answers 200 {}', r2.status === 200 && same(r2.body, {}), r2);
  await waitUntil('for-all at every listener', () =>
    listeners.every((c) => c.got.some((g) => g.event === 'for-all')))
    .catch((err) => check('for-all reached every listener', false, String(err.message)));
  observe('listener_events', Object.fromEntries(listeners.map((c) => [c.label, c.got.map((g) => g.event)])));
  check('excluded L0 got only for-all', same(excluded.got.map((g) => g.event), ['for-all']), excluded.got);
  for (const c of listeners.slice(1)) {
    check(`${c.label} got both, in order`, same(c.got.map((g) => g.event), ['not-for-l0', 'for-all']), c.got);
  }

  // --- triggerBatch ---------------------------------------------------------------
  step('triggerBatch');
  for (const c of everyone) c.got.length = 0;
  const rb = await body(api.triggerBatch([
    { channel: pub, name: 'batch-public', data: { i: 1 } },
    { channel: room, name: 'batch-presence', data: { i: 2 } },
  ]));
  observe('trigger_batch', rb);
  check('triggerBatch answers 200 {}', rb.status === 200 && same(rb.body, {}), rb);
  await waitUntil('batch events everywhere', () =>
    listeners.every((c) => c.got.some((g) => g.event === 'batch-public')) &&
    people.every((c) => c.got.some((g) => g.event === 'batch-presence')))
    .catch((err) => check('batch events reached every subscriber', false, String(err.message)));
  // The broker has handled the batch (every subscriber has its event): a marker on both
  // channels now comes after any stray or duplicate delivery of it.
  step('marker after triggerBatch');
  await api.triggerBatch([
    { channel: pub, name: 'marker', data: {} },
    { channel: room, name: 'marker', data: {} },
  ]);
  await waitUntil('the marker everywhere', () =>
    everyone.every((c) => c.got.some((g) => g.event === 'marker')))
    .catch((err) => check('marker reached every subscriber', false, String(err.message)));
  const marker = (name) => ({ channel: name, event: 'marker', data: {} });
  for (const c of listeners) {
    check(`${c.label} batch-public only`, same(c.got, [{ channel: pub, event: 'batch-public', data: { i: 1 } }, marker(pub)]), c.got);
  }
  for (const c of people) {
    check(`${c.label} batch-presence only`, same(c.got, [{ channel: room, event: 'batch-presence', data: { i: 2 } }, marker(room)]), c.got);
  }

  // --- trigger with info ----------------------------------------------------------
  step('trigger with info');
  const ri = await body(api.trigger([pub, room], 'counted', { n: 3 }, { info: 'user_count,subscription_count' }));
  observe('trigger_info', ri);
  check('trigger info counts', ri.status === 200 && same(ri.body, {
    channels: { [pub]: { subscription_count: 3 }, [room]: { user_count: 3, subscription_count: 4 } },
  }), ri);

  // --- channel queries --------------------------------------------------------------
  step('GET /channels');
  const channels = await body(api.get({ path: '/channels' }));
  observe('get_channels', channels);
  check('GET /channels lists exactly the occupied channels', channels.status === 200 &&
    channels.body.channels && same(Object.keys(channels.body.channels).sort(), [pub, room].sort()) &&
    Object.values(channels.body.channels).every((v) => same(v, {})), channels);

  step('GET /channels presence filter');
  const filtered = await body(api.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }));
  observe('get_channels_presence', filtered);
  check('GET /channels?filter_by_prefix=presence-&info=user_count',
    filtered.status === 200 && same(filtered.body, { channels: { [room]: { user_count: 3 } } }), filtered);

  step('GET /channels/<presence>');
  const one = await body(api.get({ path: `/channels/${room}`, params: { info: 'user_count' } }));
  observe('get_presence_channel', one);
  check('GET /channels/<presence>?info=user_count',
    one.status === 200 && one.body.occupied === true && one.body.user_count === 3, one);

  step('GET /channels/<presence>/users');
  const users = await body(api.get({ path: `/channels/${room}/users` }));
  observe('get_presence_users', users);
  const ids = users.body && Array.isArray(users.body.users) ? users.body.users.map((u) => u.id).sort() : null;
  check('GET /channels/<presence>/users lists distinct users', users.status === 200 && same(ids, ['u1', 'u2', 'u3']), users);
  check('users entries carry only ids', users.body.users && users.body.users.every((u) => same(Object.keys(u), ['id'])), users.body);

  step('GET /channels/<unoccupied>');
  const empty = await body(api.get({ path: `/channels/nobody-here-${tag}` }));
  observe('get_unoccupied_channel', empty);
  check('unoccupied channel reports occupied=false', empty.status === 200 && empty.body.occupied === false, empty);

  // Roster shrinks when a user's last tab leaves, but not before.
  step('presence leave');
  people[0].pusher.disconnect(); // u1 still has P-u1b
  people[2].pusher.disconnect(); // u2 gone
  await waitUntil('u2 removed at remaining members', () =>
    [people[1], people[3]].every((c) => c.pusher.channel(room).members.count === 2))
    .catch((err) => check('member_removed for u2 reached remaining members', false, String(err.message)));
  const after = await body(api.get({ path: `/channels/${room}/users` }));
  observe('get_presence_users_after_leave', after);
  const idsAfter = after.body && Array.isArray(after.body.users) ? after.body.users.map((u) => u.id).sort() : null;
  check('users after leave', after.status === 200 && same(idsAfter, ['u1', 'u3']), after);
});
