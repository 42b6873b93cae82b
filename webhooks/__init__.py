"""The webhook sender: its own process, fed by the broker (docs/webhooks.md).

The broker works out each webhook event once per cluster and hands it over; this
process stores it durably, holds and cancels short-lived leaves (the debounce), batches
events per endpoint and delivers them over HTTP with retries. Modules:

* :mod:`~vask.webhooks.core`: the scheduling, free of I/O (debounce, batches, order per
  channel, the retry policy);
* :mod:`~vask.webhooks.store`: the SQLite queue (events, released events per endpoint,
  formed requests, and the broker position acknowledged);
* :mod:`~vask.webhooks.delivery`: one HTTP attempt and its signed headers;
* :mod:`~vask.webhooks.link`: the DEALER socket to the broker;
* :mod:`~vask.webhooks.sender`: the process (:func:`~vask.webhooks.sender.run_sender`).

Order: the events of one channel reach an endpoint in the order the broker saw them.
An event queued behind a held leave of its channel waits for that leave to be released
or cancelled, and an event whose channel is in an unfinished request to an endpoint
(in flight or waiting to be retried) waits for that request to be delivered or given
up. A request that is given up is not re-ordered: later events of its channel go on.
Delivery is at least once: a request whose answer was lost (a timeout, a crash of the
sender) is sent again with the same body.
"""
