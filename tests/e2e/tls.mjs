// Scenario: Vask serving TLS on its port (run with --tls and NODE_EXTRA_CA_CERTS set to
// the test CA). pusher-js connects over wss:// (forceTLS), subscribes, and receives two
// events: one triggered here with the Node SDK over https://, and one triggered by the
// Python side with pusher-http-python over https:// once this script says it waits.
import {
  run, makeClient, connected, subscribe, once, within, same, api, observe, check, step, tag,
  settings,
} from './lib.mjs';

run(async () => {
  check('started with --tls', settings.tls, settings);
  const channelName = `tls-${tag}`;
  const a = makeClient('A');
  step('connect');
  await connected(a);
  // pusher-js names the transport it settled on; over TLS it must be the wss one.
  observe('transport', a.pusher.connection.connection?.transport?.name ?? null);
  observe('encrypted', a.pusher.connection.isUsingTLS());
  step('subscribe');
  const { channel } = await subscribe(a, channelName);

  const payload = { via: 'node-sdk', n: 7 };
  const fromNode = once(channel, 'from-node');
  step('trigger over https (node SDK)');
  const response = await api.trigger(channelName, 'from-node', payload);
  observe('trigger_status', response.status);
  const { data } = await within(5000, 'the node SDK event', fromNode);
  observe('node_event', data);
  check('node SDK event intact', same(data, payload), data);

  step('wait for the python SDK event');
  const fromPython = once(channel, 'from-python');
  // One line for the Python side: the channel to trigger on. The result line comes last.
  process.stdout.write(`${JSON.stringify({ waiting: channelName })}\n`);
  const second = await within(8000, 'the python SDK event', fromPython);
  observe('python_event', second.data);
});
