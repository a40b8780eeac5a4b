//! CoAP messages the session sends: answers to requests (piggybacked on the ACK of a
//! confirmable one, or non-confirmable with a message id of their own), empty ACKs,
//! and the confirmable messages the gateway starts (notifications and separate
//! responses).

use crate::message::{Reliability, Request};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

/// What an answer must carry back of its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exchange {
    pub reliability: Reliability,
    pub message_id: u16,
    pub token: Vec<u8>,
}

impl Exchange {
    pub(crate) fn of(request: &Request) -> Exchange {
        Exchange {
            reliability: request.reliability,
            message_id: request.message_id,
            token: request.token.clone(),
        }
    }

    /// The exchange of a request read by coap-lite alone (plain CoAP's first request),
    /// if it is a confirmable or non-confirmable one.
    pub(crate) fn of_packet(packet: &coap_lite::Packet) -> Option<Exchange> {
        let reliability = match packet.header.get_type() {
            MessageType::Confirmable => Reliability::Confirmable,
            MessageType::NonConfirmable => Reliability::NonConfirmable,
            _ => return None,
        };
        Some(Exchange {
            reliability,
            message_id: packet.header.message_id,
            token: packet.get_token().to_vec(),
        })
    }
}

/// A response's code, options and payload, before it is put on a message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    pub code: ResponseType,
    pub options: Vec<(CoapOption, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Reply {
    pub(crate) fn new(code: ResponseType) -> Reply {
        Reply {
            code,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A refusal with a diagnostic payload saying what was wrong (RFC 7252 §5.5.2).
    pub(crate) fn refusal(code: ResponseType, why: &str) -> Reply {
        Reply {
            code,
            options: Vec::new(),
            payload: why.as_bytes().to_vec(),
        }
    }

    pub(crate) fn option(mut self, option: CoapOption, value: Vec<u8>) -> Reply {
        self.options.push((option, value));
        self
    }

    /// Max-Age, seconds: when a device refused for its rate may try again.
    pub(crate) fn max_age(self, secs: u32) -> Reply {
        self.option(CoapOption::MaxAge, uint(secs))
    }

    fn packet(&self, kind: MessageType, message_id: u16, token: &[u8]) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(kind);
        packet.header.message_id = message_id;
        // Only response classes 2, 4 and 5 are responses; `UnKnown` is none of them.
        let code = match self.code {
            ResponseType::UnKnown => ResponseType::InternalServerError,
            code => code,
        };
        packet.header.code = MessageClass::Response(code);
        packet.set_token(token.to_vec());
        for (option, value) in &self.options {
            packet.add_option(*option, value.clone());
        }
        packet.payload = self.payload.clone();
        packet
    }

    /// The answer to `exchange`: on its ACK if confirmable, else a non-confirmable
    /// message with `own_id`.
    pub(crate) fn answer(&self, exchange: &Exchange, own_id: u16) -> Vec<u8> {
        let (kind, id) = match exchange.reliability {
            Reliability::Confirmable => (MessageType::Acknowledgement, exchange.message_id),
            Reliability::NonConfirmable => (MessageType::NonConfirmable, own_id),
        };
        encode(self.packet(kind, id, &exchange.token))
    }

    /// A confirmable message of ours (a notification, a separate response).
    pub(crate) fn confirmable(&self, message_id: u16, token: &[u8]) -> Vec<u8> {
        encode(self.packet(MessageType::Confirmable, message_id, token))
    }

    /// A non-confirmable message of ours.
    pub(crate) fn non_confirmable(&self, message_id: u16, token: &[u8]) -> Vec<u8> {
        encode(self.packet(MessageType::NonConfirmable, message_id, token))
    }
}

/// The empty ACK that stops a confirmable request's retransmission while its answer is
/// prepared (a separate response follows).
pub(crate) fn empty_ack(message_id: u16) -> Vec<u8> {
    let [a, b] = message_id.to_be_bytes();
    vec![0x60, 0x00, a, b]
}

/// Encode. Commands larger than one message are dropped before they get here, and
/// everything else the session sends is small, so only a bug (or a token longer than
/// `message::parse` ever lets through) can make this fail: then a bare 5.00 with the
/// same type and message id goes out instead of nothing.
fn encode(packet: Packet) -> Vec<u8> {
    let header = [
        0x40 | ((packet.header.get_type() as u8) << 4),
        0xa0,
        (packet.header.message_id >> 8) as u8,
        packet.header.message_id as u8,
    ];
    // A token is at most 8 bytes (RFC 7252 §3); coap-lite would encode a longer one.
    if packet.get_token().len() > 8 {
        return header.to_vec();
    }
    packet.to_bytes().unwrap_or_else(|_| header.to_vec())
}

/// A CoAP unsigned integer option value, in its shortest form (0 is empty).
pub(crate) fn uint(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_take_their_shortest_form() {
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(1), vec![1]);
        assert_eq!(uint(256), vec![1, 0]);
        assert_eq!(uint(0x0100_0000), vec![1, 0, 0, 0]);
    }

    #[test]
    fn a_confirmable_request_is_answered_on_its_ack_and_a_non_confirmable_one_with_its_own_id() {
        let reply = Reply::refusal(ResponseType::TooManyRequests, "rate").max_age(3);
        let con = Exchange {
            reliability: Reliability::Confirmable,
            message_id: 7,
            token: vec![9],
        };
        let bytes = reply.answer(&con, 99);
        let p = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(p.header.message_id, 7);
        assert_eq!(p.get_token(), &[9]);
        assert_eq!(p.get_first_option(CoapOption::MaxAge), Some(&vec![3]));
        assert_eq!(p.payload, b"rate");
        let non = Exchange {
            reliability: Reliability::NonConfirmable,
            ..con
        };
        let p = Packet::from_bytes(&reply.answer(&non, 99)).unwrap();
        assert_eq!(p.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(p.header.message_id, 99);
    }
}
