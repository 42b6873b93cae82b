// Scenario 5: client events. A whispers `client-typing` on a private channel: every other
// subscriber (placed over the workers) gets it, A never gets its own. On a presence channel
// the receivers also learn who sent it: metadata.user_id is A's presence user id, which
// the server stamps (clients cannot choose it).
import {
  run, spread, subscribe, waitUntil, same, api, observe, check, step, tag,
} from './lib.mjs';

const RECEIVERS = 3;

async function whisperRound(kind, channelName, clients) {
  const [sender, ...receivers] = clients;
  const got = new Map(clients.map((c) => [c.label, []]));
  const marked = new Map(clients.map((c) => [c.label, false]));
  const channels = [];
  for (const c of clients) {
    step(`${c.label} subscribes ${kind}`);
    const { channel } = await subscribe(c, channelName);
    channel.bind('client-typing', (data, metadata) =>
      got.get(c.label).push({ data, user_id: metadata ? metadata.user_id ?? null : null }));
    channel.bind('marker', () => marked.set(c.label, true));
    channels.push(channel);
  }
  // A user_id inside data is just payload: it must arrive untouched and must not be
  // mistaken for the sender identity the server adds on presence channels.
  const message = { typing: true, text: `hello from ${sender.label}`, user_id: 'forged' };
  step(`${kind}: sender triggers`);
  const accepted = channels[0].trigger('client-typing', message);
  check(`${kind}: pusher-js accepted the trigger`, accepted === true, accepted);
  step(`${kind}: receivers get it`);
  await waitUntil(`${kind} client-typing at every receiver`,
    () => receivers.every((r) => got.get(r.label).length > 0)).catch((err) => check(`${kind}: every receiver got client-typing`, false, String(err.message)));
  // Every receiver has it, so the broker has handled the client event. A marker
  // published now reaches every worker after anything that event made the broker send
  // there (an echo to the sender, a duplicate); the sender's own worker delivered its
  // local copies at once. So an incorrect echo or duplicate comes before the marker.
  step(`${kind}: marker`);
  await api.trigger(channelName, 'marker', {});
  await waitUntil(`${kind} marker at every client`, () => clients.every((c) => marked.get(c.label)))
    .catch((err) => check(`${kind}: marker reached every client`, false, String(err.message)));
  const report = Object.fromEntries([...got].map(([k, v]) => [k, v]));
  observe(`${kind}_deliveries`, report);
  for (const r of receivers) {
    const list = got.get(r.label);
    check(`${kind}: ${r.label} got exactly one`, list.length === 1, list);
    if (list.length > 0) {
      check(`${kind}: ${r.label} data intact`, same(list[0].data, message), list[0].data);
    }
  }
  check(`${kind}: sender got no echo`, got.get(sender.label).length === 0, got.get(sender.label));
  return got;
}

run(async () => {
  const names = ['A', ...Array.from({ length: RECEIVERS }, (_, i) => `B${i + 1}`)];
  step('connect');
  // over all the workers: the sender shares its worker with one receiver (4 clients, 3
  // workers), the others are elsewhere
  const clients = await spread(names, (label) => ({
    user: { user_id: `uid-${label}`, user_info: { name: label } },
  }));
  observe('socket_ids', clients.map((c) => c.pusher.connection.socket_id));

  const priv = await whisperRound('private', `private-chat-${tag}`, clients);
  // On a private channel there is no identity to attach.
  for (const [label, list] of priv) {
    for (const item of list) {
      check(`private: ${label} got no user_id`, item.user_id === null || item.user_id === undefined, item);
    }
  }

  const pres = await whisperRound('presence', `presence-chat-${tag}`, clients);
  for (const [label, list] of pres) {
    if (label === 'A') continue;
    for (const item of list) {
      check(`presence: ${label} metadata.user_id is the sender's`, item.user_id === 'uid-A', item.user_id);
    }
  }
});
