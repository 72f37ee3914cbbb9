"""Scion: adapting and combining transformers as pure transforms over parameter trees."""
