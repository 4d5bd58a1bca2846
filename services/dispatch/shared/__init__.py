"""What the four services share: server lifecycle, config, ids, errors, time."""
