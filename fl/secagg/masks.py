"""Masks: a stream of uniform field elements per key.

Flower's ``pseudo_rand_gen`` seeds NumPy's ``RandomState`` with 32 bits folded from
the key (XOR of its 4-byte words), so a mask could be found by trying 2**32 seeds.
fedface expands the full 32-byte key with AES-256 in counter mode (``cryptography``),
the standard PRG of secure aggregation implementations; each key is fresh per
round and per pair, so one zero nonce is safe. With M = 2**32 each 4 bytes of the
stream are one exactly uniform field element.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fl.secagg.params import MOD_RANGE


def stream(key: bytes, length: int) -> np.ndarray:
    """``length`` field elements (int64 in 0..M-1) from a 32-byte key."""
    if len(key) != 32:
        raise ValueError("a mask key has 32 bytes")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    assert MOD_RANGE == 2**32
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def agreed_key(own_secret: bytes, their_public: bytes) -> bytes:
    """The 32-byte key two devices agree on (ECDH + HKDF, Flower's
    ``generate_shared_key``; it returns the key base64-encoded for Fernet)."""
    return base64.urlsafe_b64decode(generate_shared_key(
        bytes_to_private_key(own_secret), bytes_to_public_key(their_public)))


def pairwise(own_secret: bytes, own_node: int, their_public: bytes, their_node: int,
             length: int) -> np.ndarray:
    """The pairwise mask as ``own_node`` adds it: +m if its id is the larger, -m
    otherwise, so the pair's masks cancel in the sum (Flower's convention)."""
    mask = stream(agreed_key(own_secret, their_public), length)
    return mask if own_node > their_node else -mask
