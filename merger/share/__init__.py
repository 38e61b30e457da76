"""Sharing: the child's model card, and Hub push / pull."""
