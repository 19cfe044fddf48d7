"""Atelier's public wire format: request and response schemas, and Standard Webhooks signing.

Shared by the server and the client SDK; it imports nothing else of Atelier.
"""
