"""The stages and their runner: teacher, student, distill, assistant, export, profile; validate and recipe checks."""
