"""Residency: which model copy lives on which worker, and each device's memory.

``store.ResidencyStore`` is the shared truth (in-memory for ``modelpool serve``, Redis
for several gateways); ``view.ResidencyView`` is each gateway's local read copy, fed by
the store's change events, so a warm request never waits on the store.
"""
