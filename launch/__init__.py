"""Entry points and launcher scripts."""
