// Scenario 2: a public channel subscription, then an event triggered through the HTTP
// API with the Node SDK arrives at the pusher-js client with its data intact.
import {
  run, makeClient, connected, subscribe, once, within, same, api, observe, check, step, tag,
} from './lib.mjs';

run(async () => {
  const channelName = `news-${tag}`;
  const a = makeClient('A');
  step('connect');
  await connected(a);
  step('subscribe');
  const { channel } = await subscribe(a, channelName);
  observe('subscribed', true);

  // Nested object, unicode and a number: the payload must survive the SDK's JSON
  // encoding, Vask's relay and pusher-js's decoding unchanged.
  const payload = { headline: 'Grüße ✓', n: 42, nested: { list: [1, 'two', null] } };
  const arrival = once(channel, 'breaking');
  step('trigger');
  const response = await api.trigger(channelName, 'breaking', payload);
  observe('trigger_status', response.status);
  observe('trigger_body', await response.json());
  step('receive');
  const { data } = await within(5000, 'the triggered event at A', arrival);
  observe('received', data);
  check('received data equals sent data', same(data, payload), data);
});
