"""LAN service discovery over mDNS/DNS-SD (python-zeroconf)."""
