"""Security: signing keys and signed notes, the tamper-evident audit trail of the log, and
payload fields sealed per data subject with the key stores that forgetting empties."""

from newfuse.security.audit import CHECKPOINTS, Report, checkpoint, origin_of, verify
from newfuse.security.crypto import SubjectCipher, open_key_store, use_keys, with_keys
from newfuse.security.forgetting import Forgotten, forget
from newfuse.security.key_service import KeyService, KeyServiceClient, serving_keys
from newfuse.security.keys import KeyStore, KVKeyStore, SQLiteKeyStore, SubjectKey
from newfuse.security.notes import SigningKey, VerifierKey

__all__ = [
    "CHECKPOINTS",
    "Forgotten",
    "KVKeyStore",
    "KeyService",
    "KeyServiceClient",
    "KeyStore",
    "Report",
    "SQLiteKeyStore",
    "SigningKey",
    "SubjectCipher",
    "SubjectKey",
    "VerifierKey",
    "checkpoint",
    "forget",
    "open_key_store",
    "origin_of",
    "serving_keys",
    "use_keys",
    "verify",
    "with_keys",
]
