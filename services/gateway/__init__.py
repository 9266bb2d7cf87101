"""The gateway: policy-gated, audited evidence feeds and downloads for prosecution offices (see docs/gateway-api.md)."""
