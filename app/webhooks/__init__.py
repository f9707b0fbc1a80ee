"""Webhooks: signed POSTs to a job's ``webhook_url`` on every status change."""
