/**
 * Work that needs the notebook server's files (push a folder, pull into a folder, run a file):
 * a short-lived kernel runs the `nsml` client there, with the server's own NSML settings, and
 * prints progress as tagged JSON lines the sidebar reads. The code builders are pure.
 */
import { KernelMessage, ServiceManager } from '@jupyterlab/services';

import { splitArgs } from './format';

export const PROGRESS_TAG = 'NSML-PROGRESS ';
export const RESULT_TAG = 'NSML-RESULT ';
export const ERROR_TAG = 'NSML-ERROR ';

/** A Python string literal for `s` (JSON's escapes are Python's too). */
export function py(s: string): string {
  return JSON.stringify(s);
}

const PRELUDE = [
  'import json as _j, sys as _s',
  'from nsml.client import Client as _C, NSMLError as _E',
  'def _p(e):',
  `    print(${py(PROGRESS_TAG)} + _j.dumps({"phase": e.phase, "done": e.done_bytes, "total": e.total_bytes, "files": e.done_files, "total_files": e.total_files}), flush=True)`
];

function wrap(body: string[]): string {
  return [
    ...PRELUDE,
    'try:',
    ...body.map(l => '    ' + l),
    'except _E as _e:',
    `    print(${py(ERROR_TAG)} + str(_e), flush=True)`
  ].join('\n');
}

/** Push the server folder `folder` (relative to the server's root) as dataset `name`. */
export function pushCode(name: string, folder: string): string {
  return wrap([
    'from nsml.datasets import push as _push',
    `_r = _push(_C(), ${py(name)}, ${py(folder || '.')}, on_progress=_p)`,
    `print(${py(RESULT_TAG)} + _j.dumps({"ref": str(getattr(_r, "ref", _r))}), flush=True)`
  ]);
}

/**
 * Pull dataset `ref` into the new folder `dest` (relative to the server's root); when `dest`
 * is taken (a file, or a folder that is not empty: pulled before), into `dest-2`, `dest-3` …
 */
export function pullCode(ref: string, dest: string): string {
  return wrap([
    'from nsml.datasets import pull as _pull',
    'from pathlib import Path as _P',
    `_d0 = _d = _P(${py(dest)})`,
    '_n = 1',
    'while _d.exists() and (not _d.is_dir() or any(_d.iterdir())):',
    '    _n += 1',
    '    _d = _d0.with_name(f"{_d0.name}-{_n}")',
    `_ref, _d = _pull(_C(), ${py(ref)}, _d, on_progress=_p)`,
    `print(${py(RESULT_TAG)} + _j.dumps({"ref": _ref, "dest": str(_d)}), flush=True)`
  ]);
}

export interface IRunRequest {
  folder: string;
  entry: string;
  args: string[];
  gpus: number;
  datasets: string[];
}

/** What the run dialog's one line asks for (`--gpus 1 -d mnist -- --lr 0.1`). */
export interface IRunLine {
  args: string[];
  gpus: number;
  datasets: string[];
}

/** The run dialog's hint: how its line is read ({@link parseRunLine}). */
export const RUN_LINE_HINT =
  'Arguments of the script; NSML options first, then “--”: --gpus 1 -d mnist -- --lr 0.1';

/**
 * The run dialog's line, split as a shell does (`splitArgs`): without `--` every word is
 * an argument of the script; with it, the words before are NSML options (`--gpus N`,
 * `-d`/`--dataset NAME`, repeatable) and those after are the arguments. Throws an Error
 * that names the valid options for anything else.
 */
export function parseRunLine(line: string): IRunLine {
  const words = splitArgs(line);
  const sep = words.indexOf('--');
  const opts = sep >= 0 ? words.slice(0, sep) : [];
  const out: IRunLine = { args: sep >= 0 ? words.slice(sep + 1) : words, gpus: 0, datasets: [] };
  for (let i = 0; i < opts.length; i++) {
    const opt = opts[i];
    const value = opts[i + 1];
    if (opt !== '--gpus' && opt !== '-d' && opt !== '--dataset') {
      throw new Error(`Unknown option ${opt}: give --gpus N or -d DATASET before “--”.`);
    }
    if (value === undefined) {
      throw new Error(`${opt} needs a value.`);
    }
    i++;
    if (opt === '--gpus') {
      const n = Number(value);
      if (!isFinite(n) || n < 0 || value.trim() === '') {
        throw new Error(`--gpus takes a number of GPUs (0, 0.5, 2 …), not ${value}.`);
      }
      out.gpus = n;
    } else {
      out.datasets.push(value);
    }
  }
  return out;
}

/** Start a session from the server folder `folder`, running `entry` with `args`. */
export function runCode(r: IRunRequest): string {
  return wrap([
    'from nsml.sessions import run as _run',
    `_s = _run(_C(), ${py(r.entry)}, ${JSON.stringify(r.args)}, folder=${py(r.folder || '.')}, ` +
      `gpus=${Number(r.gpus) || 0}, datasets=${JSON.stringify(r.datasets)})`,
    `print(${py(RESULT_TAG)} + _j.dumps({"name": _s["name"]}), flush=True)`
  ]);
}

export interface IProgress {
  phase: string;
  done: number;
  total: number;
}

/** One line of a job's output, classified. */
export function parseJobLine(
  line: string
):
  | { kind: 'progress'; progress: IProgress }
  | { kind: 'result'; result: { [k: string]: string } }
  | { kind: 'error'; message: string }
  | null {
  try {
    if (line.startsWith(PROGRESS_TAG)) {
      return { kind: 'progress', progress: JSON.parse(line.slice(PROGRESS_TAG.length)) };
    }
    if (line.startsWith(RESULT_TAG)) {
      return { kind: 'result', result: JSON.parse(line.slice(RESULT_TAG.length)) };
    }
  } catch {
    return null;
  }
  if (line.startsWith(ERROR_TAG)) {
    return { kind: 'error', message: line.slice(ERROR_TAG.length) };
  }
  return null;
}

/**
 * Run `code` in a fresh kernel (shut down afterwards); `onProgress` sees each progress line.
 * Resolves with the result line's object; rejects with the job's error or traceback.
 */
export async function runJob(
  services: ServiceManager.IManager,
  code: string,
  onProgress: (p: IProgress) => void
): Promise<{ [k: string]: string }> {
  const kernel = await services.kernels.startNew({ name: 'python3' });
  let result: { [k: string]: string } | null = null;
  let error: string | null = null;
  let pending = '';
  const take = (text: string) => {
    pending += text;
    const lines = pending.split('\n');
    pending = lines.pop() ?? '';
    for (const line of lines) {
      const m = parseJobLine(line);
      if (m?.kind === 'progress') {
        onProgress(m.progress);
      } else if (m?.kind === 'result') {
        result = m.result;
      } else if (m?.kind === 'error') {
        error = m.message;
      }
    }
  };
  try {
    const future = kernel.requestExecute({ code, store_history: false });
    future.onIOPub = (msg: KernelMessage.IIOPubMessage) => {
      if (KernelMessage.isStreamMsg(msg) && msg.content.name === 'stdout') {
        take(msg.content.text);
      } else if (KernelMessage.isErrorMsg(msg)) {
        error = `${msg.content.ename}: ${msg.content.evalue}`;
      }
    };
    await future.done;
    take('\n');
  } finally {
    kernel.shutdown().catch(() => undefined);
  }
  if (error !== null) {
    throw new Error(error);
  }
  if (result === null) {
    throw new Error('the job ended without a result');
  }
  return result;
}

/** Code for a notebook/console cell that shows the comparison panel of `names`. */
export function compareCode(names: string[]): string {
  return [
    "get_ipython().extension_manager.load_extension('nsml_magics')",
    `%nsml plot ${names.join(' ')}`
  ].join('\n');
}
