/** A command failed with a message for stderr and the exit code qemu-img would give. */
export class CliFailure extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
    readonly hint?: string,
  ) {
    super(message);
  }
}
