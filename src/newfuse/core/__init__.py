"""Transactions across agents: sagas, compensation, locks and deadlock detection; the Bus facade."""
