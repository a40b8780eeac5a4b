//! A session's input: the datagrams the dispatcher routes to it, and its DTLS
//! session's end.
//!
//! A bounded single-consumer queue that costs an idle session about a hundred bytes.
//! A tokio `mpsc` channel allocates its slots 32 at a time and keeps the block while
//! the channel lives (about 1.5 KB for every idle DTLS session); this queue holds
//! what waits and gives the room back once it is drained.

use crate::dtls;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Room a drained queue keeps for the next datagrams.
const KEEP: usize = 4;

/// What the dispatcher hands a session.
pub(crate) enum Input {
    Datagram(Vec<u8>),
    /// The DTLS session ended, and why (boxed: it is rare and larger than a datagram).
    Closed(Box<dtls::Closed>),
    /// Something the session keeps an eye on changed: it was kicked, or the
    /// configuration was reloaded (rung by a `Bell`; the session looks at both).
    Bell,
}

/// Why an input was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The session has `capacity` inputs waiting already.
    Full,
    /// The session is over.
    Closed,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Told once per input (and at the sender's end); a permit is kept for a
    /// receiver not yet waiting, so no wake-up is lost.
    ready: Notify,
}

struct Queue {
    items: VecDeque<Input>,
    capacity: usize,
    rung: bool,
    sender_gone: bool,
    receiver_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent whatever a panicking holder did (it only pushes and
        // pops), so a poisoned lock is used as it is.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue of at most `capacity` inputs, and its two ends.
pub(crate) fn inbox(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            rung: false,
            sender_gone: false,
            receiver_gone: false,
        }),
        ready: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// The dispatcher's end. Dropping it ends the session's input.
pub(crate) struct Sender(Arc<Shared>);

impl Sender {
    pub(crate) fn try_send(&self, input: Input) -> Result<(), Refused> {
        let mut q = self.0.lock();
        if q.receiver_gone {
            return Err(Refused::Closed);
        }
        if q.items.len() >= q.capacity {
            return Err(Refused::Full);
        }
        q.items.push_back(input);
        drop(q);
        self.0.ready.notify_one();
        Ok(())
    }

    /// The session has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.lock().receiver_gone
    }

    pub(crate) fn ring(&self) {
        ring(&self.0);
    }
}

/// Wakes the session with `Input::Bell` (once however often it is rung before the
/// session looks), whatever is queued; it does not keep the session's input open.
pub(crate) struct Bell(Arc<Shared>);

impl Bell {
    pub(crate) fn ring(&self) {
        ring(&self.0);
    }
}

fn ring(shared: &Shared) {
    shared.lock().rung = true;
    shared.ready.notify_one();
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.lock().sender_gone = true;
        self.0.ready.notify_one();
    }
}

/// The session's end.
pub(crate) struct Receiver(Arc<Shared>);

impl Receiver {
    /// The next input, or `None` once the dispatcher has let the session go and
    /// everything queued before has been taken. Cancel-safe: an input is taken only
    /// when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Input> {
        loop {
            {
                let mut q = self.0.lock();
                if q.rung {
                    q.rung = false;
                    return Some(Input::Bell);
                }
                if let Some(input) = q.items.pop_front() {
                    if q.items.is_empty() && q.items.capacity() > KEEP {
                        q.items.shrink_to(KEEP);
                    }
                    return Some(input);
                }
                if q.sender_gone {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }
}

impl Receiver {
    pub(crate) fn bell(&self) -> Bell {
        Bell(self.0.clone())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.receiver_gone = true;
        q.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn poll_recv(rx: &mut Receiver) -> Poll<Option<Input>> {
        let mut cx = Context::from_waker(Waker::noop());
        pin!(rx.recv()).as_mut().poll(&mut cx)
    }

    fn datagram(byte: u8) -> Input {
        Input::Datagram(vec![byte])
    }

    fn byte_of(p: Poll<Option<Input>>) -> Option<u8> {
        match p {
            Poll::Ready(Some(Input::Datagram(d))) => Some(d[0]),
            _ => None,
        }
    }

    #[test]
    fn inputs_come_out_in_order() {
        let (tx, mut rx) = inbox(8);
        for b in 1..=3 {
            tx.try_send(datagram(b)).unwrap();
        }
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(1));
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(2));
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(3));
        assert!(poll_recv(&mut rx).is_pending());
    }

    #[test]
    fn a_full_queue_refuses_more_until_drained() {
        let (tx, mut rx) = inbox(2);
        tx.try_send(datagram(1)).unwrap();
        tx.try_send(datagram(2)).unwrap();
        assert_eq!(tx.try_send(datagram(3)), Err(Refused::Full));
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(1));
        tx.try_send(datagram(4)).unwrap();
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(2));
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(4));
    }

    #[test]
    fn the_receiver_hears_the_sender_go_after_what_it_queued() {
        let (tx, mut rx) = inbox(4);
        tx.try_send(datagram(7)).unwrap();
        drop(tx);
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(7));
        assert!(matches!(poll_recv(&mut rx), Poll::Ready(None)));
    }

    #[test]
    fn the_sender_hears_the_session_end() {
        let (tx, rx) = inbox(4);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(datagram(1)), Err(Refused::Closed));
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let (tx, mut rx) = inbox(64);
        for b in 0..64 {
            tx.try_send(datagram(b)).unwrap();
        }
        while byte_of(poll_recv(&mut rx)).is_some() {}
        assert!(rx.0.lock().items.capacity() <= KEEP);
    }

    #[test]
    fn a_bell_comes_before_what_is_queued_and_once_however_often_rung() {
        let (tx, mut rx) = inbox(4);
        tx.try_send(datagram(1)).unwrap();
        let bell = rx.bell();
        bell.ring();
        tx.ring();
        assert!(matches!(poll_recv(&mut rx), Poll::Ready(Some(Input::Bell))));
        assert_eq!(byte_of(poll_recv(&mut rx)), Some(1));
        assert!(poll_recv(&mut rx).is_pending());
    }

    #[test]
    fn a_bell_does_not_keep_the_input_open() {
        let (tx, mut rx) = inbox(4);
        let _bell = rx.bell();
        drop(tx);
        assert!(matches!(poll_recv(&mut rx), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_an_input() {
        let (tx, mut rx) = inbox(4);
        let waiter = tokio::spawn(async move { rx.recv().await.is_some() });
        tokio::task::yield_now().await;
        tx.try_send(datagram(1)).unwrap();
        assert!(waiter.await.unwrap());
    }
}
