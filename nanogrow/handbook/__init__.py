"""The Handbook of Growing: studies (configs/handbook/*.toml) run into result stores (*.jsonl next to them) and
rendered into HANDBOOK.md. ``nanogrow handbook run STUDY | report [STUDY] | list``."""
