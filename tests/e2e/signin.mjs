// Scenario 6: user sign-in. Two connections signed in as the same user (on different
// workers) both get a server-to-user event sent with the Node SDK's sendToUser;
// a connection signed in as someone else does not. terminateUserConnections then drops
// exactly that user's connections (close code 4200 per Vask's scope), pusher-js
// reconnects by itself and signs in again, and the other user is left alone.
import {
  run, spread, waitUntil, same, markers, api, observe, check, step,
} from './lib.mjs';

// Signed in and the #server-to-user channel confirmed: the point where pusher-js
// starts passing user events to pusher.user callbacks.
const signedIn = (c) => {
  const ch = c.pusher.user.serverToUserChannel;
  return Boolean(c.pusher.user.user_data && ch && ch.subscribed);
};

run(async () => {
  const ada = { id: 'ada-42', user_info: { name: 'Ada' } };
  const bob = { id: 'bob-7', user_info: { name: 'Bob' } };
  step('connect');
  // each on its own worker (with 3 workers)
  const clients = await spread(['ada-1', 'ada-2', 'bob'],
    (label) => ({ signinUser: label === 'bob' ? bob : ada }));
  const [ada1, ada2, bobClient] = clients;
  for (const c of clients) {
    c.orders = [];
    c.pusher.user.bind('order', (data) => c.orders.push(data));
    c.pusher.user.bind('pusher:signin_error', (err) => c.errors.push({ signin_error: err }));
  }
  const initialIds = observe('socket_ids', clients.map((c) => c.pusher.connection.socket_id));

  step('signin');
  for (const c of clients) c.pusher.signin();
  await waitUntil('all three signed in', () => clients.every(signedIn));
  const success = ada1.frames.find((f) => f.event === 'pusher:signin_success');
  observe('signin_success_user_data', success ? success.data.user_data : null);
  check('signin_success echoes user_data', success && JSON.parse(success.data.user_data).id === ada.id, success);

  step('marker channel');
  const mark = await markers(clients);

  step('sendToUser');
  const order = { order_id: 1001, items: ['tea', 'scones'] };
  const response = await api.sendToUser(ada.id, 'order', order);
  observe('send_status', response.status);
  await waitUntil('order at both of ada\'s connections', () => ada1.orders.length > 0 && ada2.orders.length > 0)
    .catch((err) => check('order reached every ada connection', false, String(err.message)));
  // both of ada's connections have it, so the broker has handled it: a wrong delivery
  // to bob or a duplicate comes before this marker
  await mark('after sendToUser');
  observe('orders', Object.fromEntries(clients.map((c) => [c.label, [...c.orders]])));
  for (const c of [ada1, ada2]) {
    check(`${c.label} got the order once`, c.orders.length === 1, c.orders);
    check(`${c.label} order data intact`, same(c.orders[0], order), c.orders[0]);
  }
  check('bob got no order', bobClient.orders.length === 0, bobClient.orders);

  step('terminate');
  const before = clients.map((c) => c.states.length);
  const terminated = await api.terminateUserConnections(ada.id);
  observe('terminate_status', terminated.status);
  await waitUntil('ada connections to leave connected', () =>
    [ada1, ada2].every((c, i) => c.states.slice(before[i]).some((s) => s !== 'connected')))
    .catch((err) => check('terminate dropped ada connections', false, String(err.message)));
  observe('ada_states_after_terminate', [ada1, ada2].map((c, i) => c.states.slice(before[i])));
  // pusher-js surfaces the close code through connection 'error' as PusherError data.
  const codes = [ada1, ada2].map((c) => c.errors.map((e) => e.error && e.error.code).filter(Boolean));
  observe('ada_close_codes', codes);
  for (const [i, c] of [ada1, ada2].entries()) {
    check(`${c.label} closed with 4200`, codes[i].includes(4200), c.errors);
  }

  step('reconnect');
  // 4200 means "reconnect immediately": pusher-js must come back and sign in again.
  await waitUntil('ada connections back and signed in', () => [ada1, ada2].every(
    (c) => c.pusher.connection.state === 'connected' && signedIn(c)))
    .catch((err) => check('ada reconnected and signed in again', false, String(err.message)));
  const newIds = observe('socket_ids_after_reconnect', [ada1, ada2].map((c) => c.pusher.connection.socket_id));
  check('reconnects got fresh socket ids', newIds.every((id, i) => id !== initialIds[i]), { before: initialIds, after: newIds });
  observe('bob_states', bobClient.states);
  check('bob untouched by terminate', bobClient.states.length === before[2] && bobClient.pusher.connection.state === 'connected',
    bobClient.states);

  // After the reconnect the same user must be reachable again.
  step('sendToUser after reconnect');
  await api.sendToUser(ada.id, 'order', { order_id: 1002 });
  await waitUntil('second order at both ada connections', () => ada1.orders.length >= 2 && ada2.orders.length >= 2)
    .catch((err) => check('order reached ada after reconnect', false, String(err.message)));
});
