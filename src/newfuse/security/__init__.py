"""Security: payload fields sealed per data subject, and the key stores that forgetting empties."""

from newfuse.security.crypto import SubjectCipher, open_key_store, use_keys
from newfuse.security.keys import KeyStore, KVKeyStore, SQLiteKeyStore, SubjectKey

__all__ = [
    "KVKeyStore",
    "KeyStore",
    "SQLiteKeyStore",
    "SubjectCipher",
    "SubjectKey",
    "open_key_store",
    "use_keys",
]
