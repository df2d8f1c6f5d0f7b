"""kiln.events"""
