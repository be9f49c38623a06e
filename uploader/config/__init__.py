"""The TOML config file into frozen dataclasses, validated once at load: settings, stores, tables."""
