"""CPNS messages: the model (frozen dataclasses) and the deterministic CBOR codec."""

from cpns.messages.codec import decode, decode_record, encode, encode_record, to_json
from cpns.messages.constants import MessageType
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
    Message,
    PNEHello,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)

__all__ = [
    "EUKeyAssignmentAck",
    "EUKeyAssignmentNotification",
    "EUKeyAssignmentRequest",
    "EUKeyAssignmentResponse",
    "ErrorMessage",
    "KeyBundle",
    "Message",
    "MessageType",
    "PNEHello",
    "UserKeyAssignmentRequest",
    "UserKeyAssignmentResponse",
    "decode",
    "decode_record",
    "encode",
    "encode_record",
    "to_json",
]
