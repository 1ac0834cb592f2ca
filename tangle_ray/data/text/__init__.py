"""Text data: synthetic stories, tokenizers, text sources, token-file preparation and window sampling."""
