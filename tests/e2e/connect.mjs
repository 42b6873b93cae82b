// Scenario 1: pusher-js completes the handshake and gets a well-formed socket_id.
import { run, makeClient, connected, observe, check, step } from './lib.mjs';

run(async () => {
  const a = makeClient('A');
  step('connect');
  const socketId = await connected(a);
  observe('state', a.pusher.connection.state);
  observe('socket_id', socketId);
  check('state is connected', a.pusher.connection.state === 'connected', a.pusher.connection.state);
  // Server SDKs validate socket ids with exactly this pattern before signing anything.
  check('socket_id matches digits.digits', /^\d+\.\d+$/.test(socketId ?? ''), socketId);
});
