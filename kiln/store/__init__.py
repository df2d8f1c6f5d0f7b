"""kiln.store"""
