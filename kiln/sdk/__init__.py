"""kiln.sdk"""
