import { compareCode, parseJobLine, pushCode, py, runCode } from '../src/jobs';

test('Python literals escape quotes and newlines', () => {
  expect(py('a"b\nc')).toBe('"a\\"b\\nc"');
});

test('push code names the dataset and folder as literals', () => {
  const code = pushCode('mnist', 'data/my "set"');
  expect(code).toContain('_push(_C(), "mnist", "data/my \\"set\\"", on_progress=_p)');
});

test('run code passes entry, arguments, GPUs and datasets', () => {
  const code = runCode({
    folder: 'proj',
    entry: 'train.py',
    args: ['--lr', '0.1'],
    gpus: 2,
    datasets: ['mnist']
  });
  expect(code).toContain(
    '_run(_C(), "train.py", ["--lr","0.1"], folder="proj", gpus=2, datasets=["mnist"])'
  );
});

test.each([
  [
    'NSML-PROGRESS {"phase": "upload", "done": 5, "total": 10}',
    { kind: 'progress', progress: { phase: 'upload', done: 5, total: 10 } }
  ],
  ['NSML-RESULT {"ref": "mnist@2"}', { kind: 'result', result: { ref: 'mnist@2' } }],
  ['NSML-ERROR dataset not found', { kind: 'error', message: 'dataset not found' }],
  ['NSML-PROGRESS {broken', null],
  ['other output', null]
])('parseJobLine(%p)', (line, want) => {
  expect(parseJobLine(line)).toEqual(want);
});

test('compare code loads the magics and plots the sessions', () => {
  expect(compareCode(['a/d/1', 'a/d/2'])).toMatch(
    /load_extension\('nsml_magics'\)\n%nsml plot a\/d\/1 a\/d\/2$/
  );
});
