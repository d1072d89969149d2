"""Operations around the lesson: run directories, ranks, the memory plan, flags, formats, files, the CPU pin."""
