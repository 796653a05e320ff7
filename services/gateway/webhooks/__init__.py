"""Webhooks: signed, durable, SSRF-checked notifications of job events to tenants' URLs."""
