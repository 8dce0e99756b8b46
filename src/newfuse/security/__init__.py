"""Security: payload fields sealed per data subject, and the key stores that forgetting empties."""

from newfuse.security.crypto import SubjectCipher, open_key_store, use_keys, with_keys
from newfuse.security.forgetting import Forgotten, forget
from newfuse.security.keys import KeyStore, KVKeyStore, SQLiteKeyStore, SubjectKey

__all__ = [
    "Forgotten",
    "KVKeyStore",
    "KeyStore",
    "SQLiteKeyStore",
    "SubjectCipher",
    "SubjectKey",
    "forget",
    "open_key_store",
    "use_keys",
    "with_keys",
]
