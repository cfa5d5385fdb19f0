/**
 * `--output=json` as qemu-img prints it (QEMU's pretty JSON, keys in QDict order). The QMP
 * package that knows the order loads only when JSON is asked for: human output starts faster.
 */
export async function qemuJson(v: unknown): Promise<string> {
  const { toQemuPrettyJson } = await import('@blockrep/qmp');
  return toQemuPrettyJson(v);
}
