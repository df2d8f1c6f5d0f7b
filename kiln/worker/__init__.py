"""kiln.worker"""
