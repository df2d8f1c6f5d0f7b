"""kiln.dispatch"""
