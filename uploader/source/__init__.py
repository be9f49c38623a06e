"""Job sources: the types every source shares (base.py) and one subpackage per broker."""
