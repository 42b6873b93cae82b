// Scenario 4: presence across workers. Clients join one at a time; every client already
// in the channel must see member_added with the newcomer's user_info, and every roster
// must count everybody. Then they leave one at a time and the rest see member_removed.
// The six clients are placed over all the workers (spread()), and we check every pair;
// the second tab of user-0 is placed on another worker than its first.
import {
  run, connectOn, spread, workerOf, subscribe, waitUntil, same, api, observe, check, step, tag,
} from './lib.mjs';

const COUNT = Number(process.env.E2E_PRESENCE_CLIENTS ?? 6);

run(async () => {
  const channelName = `presence-room-${tag}`;
  const users = Array.from({ length: COUNT }, (_, i) => (
    { user_id: `user-${i}`, user_info: { name: `Person ${i}`, seat: i } }));
  step('connect');
  const members = await spread(users.map((_, i) => `C${i}`), (_, i) => ({ user: users[i] }));
  for (const [i, entry] of members.entries()) {
    entry.user = users[i];
    entry.added = []; // [{id, info}] in arrival order
    entry.removed = []; // [id]
    entry.markers = 0; // marker events seen (see mark below)
  }
  observe('socket_ids', members.map((m) => m.pusher.connection.socket_id));

  // Join one by one so each member_added has one unambiguous expected recipient set.
  for (let k = 0; k < COUNT; k += 1) {
    const m = members[k];
    step(`C${k} joins`);
    const { channel, data } = await subscribe(m, channelName, 5000, (ch) => {
      ch.bind('pusher:member_added', (member) => m.added.push({ id: member.id, info: member.info }));
      ch.bind('pusher:member_removed', (member) => m.removed.push(member.id));
      ch.bind('marker', () => { m.markers += 1; });
    });
    m.channel = channel;
    // The joining socket's own roster must already include everybody so far, itself too.
    check(`C${k} roster count on join`, data.count === k + 1, { count: data.count, expected: k + 1 });
    check(`C${k} sees itself as me`, data.me && data.me.id === m.user.user_id, data.me);
    step(`earlier members see user-${k}`);
    await waitUntil(`member_added(user-${k}) at C0..C${k - 1}`, () =>
      members.slice(0, k).every((e) => e.added.some((a) => a.id === m.user.user_id)),
    ).catch((err) => check(`member_added(user-${k}) everywhere`, false, String(err.message)));
  }
  // Absence checks wait for a marker published on the channel itself after the broker
  // has handled the joins/leaves in question: what they caused reaches every member
  // before the marker (the broker tells each worker in order), so nothing is missed.
  let markersSent = 0;
  const mark = async (what) => {
    markersSent += 1;
    const n = markersSent;
    await api.trigger(channelName, 'marker', { n });
    await waitUntil(`marker ${n} (${what}) at every member`,
      () => members.every((m) => m.markers >= n));
  };
  await mark('after the joins'); // a stray duplicate or self-notification comes first

  const pairs = [];
  for (let i = 0; i < COUNT; i += 1) {
    const m = members[i];
    const expectedAdded = members.slice(i + 1).map((e) => e.user.user_id);
    const gotAdded = m.added.map((a) => a.id);
    pairs.push({ client: m.label, added: gotAdded });
    check(`C${i} member_added exactly the later joiners`,
      same(gotAdded, expectedAdded), { got: gotAdded, expected: expectedAdded });
    for (const a of m.added) {
      const joiner = members.find((e) => e.user.user_id === a.id);
      if (joiner) {
        check(`C${i} got user_info of ${a.id}`,
          same(a.info, joiner.user.user_info), a.info);
      }
    }
    check(`C${i} never saw itself added`, !gotAdded.includes(m.user.user_id), gotAdded);
    check(`C${i} members.count`, m.channel.members.count === COUNT,
      { count: m.channel.members.count, expected: COUNT });
    const other = members[(i + 1) % COUNT];
    const seen = m.channel.members.get(other.user.user_id);
    check(`C${i} roster has ${other.user.user_id} with info`,
      seen && same(seen.info, other.user.user_info), seen);
  }
  observe('member_added_per_client', pairs);
  observe('counts_after_join', members.map((m) => m.channel.members.count));

  // A second connection of an existing user is the same member: nobody may see a
  // member_added for it, and its leaving must not remove the user either.
  step('second tab of user-0 joins');
  const tab = await connectOn('C0-tab', { user: members[0].user }, { avoid: [workerOf(members[0])] });
  const { data: tabRoster } = await subscribe(tab, channelName);
  observe('second_tab_roster_count', tabRoster.count);
  check('second tab roster count', tabRoster.count === COUNT, tabRoster.count);
  await mark('after the second tab joined'); // its subscribe was handled by the broker
  const dupAdds = members.filter((m) => m.added.length !== COUNT - 1 - members.indexOf(m));
  check('no member_added for a second connection of a present user', dupAdds.length === 0,
    dupAdds.map((m) => ({ client: m.label, added: m.added.map((a) => a.id) })));
  step('second tab leaves');
  tab.pusher.disconnect();
  // The broker has handled the tab's close once the channel counts one subscription
  // fewer; a marker published after that comes after any member_removed it caused.
  await waitUntil('the broker to drop the second tab', async () => {
    const r = await api.get({ path: `/channels/${channelName}`, params: { info: 'subscription_count' } });
    const body = await r.json();
    return body.subscription_count === COUNT;
  }, 10000);
  await mark('after the second tab left');
  const earlyRemoves = members.filter((m) => m.removed.length > 0);
  check('no member_removed while user-0 still has a connection', earlyRemoves.length === 0,
    earlyRemoves.map((m) => ({ client: m.label, removed: m.removed })));

  // Leave last-in first-out; each departure must reach every remaining client.
  for (let k = COUNT - 1; k >= 1; k -= 1) {
    const leaver = members[k];
    step(`C${k} disconnects`);
    leaver.pusher.disconnect();
    const rest = members.slice(0, k);
    await waitUntil(`member_removed(user-${k}) at C0..C${k - 1}`, () =>
      rest.every((e) => e.removed.includes(leaver.user.user_id)),
    ).catch((err) => check(`member_removed(user-${k}) everywhere`, false, String(err.message)));
    await waitUntil(`members.count == ${k} at C0..C${k - 1}`, () =>
      rest.every((e) => e.channel.members.count === k),
    ).catch(() => check(`members.count after user-${k} left`, false,
      rest.map((e) => e.channel.members.count)));
  }
  observe('removed_at_C0', members[0].removed);
  const expectedRemoved = members.slice(1).map((e) => e.user.user_id).reverse();
  check('C0 saw every departure once, in order',
    same(members[0].removed, expectedRemoved),
    { got: members[0].removed, expected: expectedRemoved });
  observe('final_count_at_C0', members[0].channel.members.count);
});
