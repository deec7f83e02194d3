"""Development tools, not the runtime: the demo, the benchmark, the fault suite and the fake
microservice. Nothing in the runtime imports them; ``stock-sync fake-microservice`` is added
as a plugin command (entry point group ``stock_sync.commands``).
"""
