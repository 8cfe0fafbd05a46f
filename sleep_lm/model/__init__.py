"""The hybrid model as pure functions: its config, the blocks, the layer loop, sleep (Algorithm 1),
attention windows, sharding rules, the GDN retrofit."""
