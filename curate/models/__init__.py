"""Model loading (language ID, CLIP): local files only at test and demo time."""
