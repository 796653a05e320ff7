"""Durable records (SQL). Only the gateway and the operator CLI open the database."""
