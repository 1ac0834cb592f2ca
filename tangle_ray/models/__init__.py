"""Model families: one file each, the supernet and the standalone model it extracts to."""
