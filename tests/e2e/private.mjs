// Scenario 3: private channel auth signed with the right secret is accepted; a second
// client whose signature was made with the wrong secret is refused with
// pusher:subscription_error (and stays connected, per the protocol).
import {
  run, makeClient, connected, subscribe, subscriptionError, once, within, api, observe,
  check, step, markers, tag,
} from './lib.mjs';

run(async () => {
  const channelName = `private-orders-${tag}`;
  const good = makeClient('good');
  const bad = makeClient('bad', { badAuth: true });
  step('connect');
  await Promise.all([connected(good), connected(bad)]);

  step('good subscribes');
  const { channel } = await subscribe(good, channelName);
  observe('good_subscribed', true);

  step('bad subscribes');
  const error = await subscriptionError(bad, channelName);
  observe('bad_error', error);
  // pusher-js reports server refusals as {type:'AuthError', error, status}.
  check('bad error has a payload', error && typeof error === 'object', error);
  // pusher-js reports client-side auth failures the same way, so make sure this one
  // really came from the server as a frame.
  const frame = bad.frames.find((f) => f.event === 'pusher:subscription_error');
  observe('bad_error_frame', frame ?? null);
  check('server sent pusher:subscription_error for the channel', frame && frame.channel === channelName, bad.frames);

  // The refused client must not receive events on the channel; the accepted one must.
  const mark = await markers([bad]);
  const badChannel = bad.pusher.channel(channelName);
  let leaked = null;
  badChannel.bind('secret', (d) => { leaked = d; });
  const arrival = once(channel, 'secret');
  step('trigger');
  await api.trigger(channelName, 'secret', { v: 1 });
  step('receive');
  const { data } = await within(5000, 'the private event at good', arrival);
  observe('good_received', data);
  // the broker has handled the event (good has it): a leak to bad would come first
  await mark('after the private event');
  observe('bad_received', leaked);
  check('refused client got nothing', leaked === null, leaked);
  observe('bad_state', bad.pusher.connection.state);
  check('refused client stays connected', bad.pusher.connection.state === 'connected', bad.pusher.connection.state);
});
